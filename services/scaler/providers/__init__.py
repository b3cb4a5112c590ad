"""Node providers: where worker nodes come from (local processes now; Slurm, PBS, Globus Compute next)."""
