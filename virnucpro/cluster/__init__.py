"""The workflow on a SLURM cluster: what SLURM's commands say (``slurm``), whether the profile's requests fit
the partition's nodes (``fit``), and a failed job told apart as lost to the infrastructure or failed on its
own (``losses``). Nothing here imports snakemake: the workflow passes its objects in."""
