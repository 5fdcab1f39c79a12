"""The BentoML service (:mod:`service.service`) and its loader, input checks and model-store helper.

Importing this package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is already set. It has to
be set before torch loads its OpenMP runtime, and :mod:`service.service` imports torch (through
:mod:`nad_guard`). With the default policy, torch's OpenMP threads spin for a while after every
parallel region. A server that alternates forward passes with HTTP work then burns a core's share
spinning, which the event loop, and on a small machine the clients too, would otherwise get.

Measured on the 2-core test machine, in-process: ``Guard.run`` on 64 rows alternating with 10 ms of
Python work, 2 torch threads. The process kept 1.87-1.92 cores busy with the default policy and
1.42-1.43 with ``PASSIVE``. The serving effect is in bench/results/serve_load_runs/omp_wait_policy/.
Set ``OMP_WAIT_POLICY=ACTIVE`` to keep spinning (e.g. for a server with cores to spare).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
