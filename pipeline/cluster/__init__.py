"""Where a run runs: Ray start-up, checks at the door, ``n2n submit`` and KubeRay RayJobs."""
