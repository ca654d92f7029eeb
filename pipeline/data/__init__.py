"""The data and the teacher: datasets split for rewards and tests, teachers trained or loaded."""
