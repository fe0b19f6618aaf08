"""The plan as tiles of torch ops (``compiled``), its workspaces and finishing step,
the backward's row sums, and the threads the tiles run on (``pools``)."""
