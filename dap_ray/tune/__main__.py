"""python -m dap_ray.tune: runs dap_ray.tune.sweep.main (the trial function lives in an importable
module, dap_ray.tune.trial, so Ray pickles it by reference)."""

import sys

from dap_ray.tune.sweep import main

if __name__ == "__main__":
    sys.exit(main())
