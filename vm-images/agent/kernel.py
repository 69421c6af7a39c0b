"""The interpreter process the agent supervises; the code is in shoal_kernel.py (kept out of
__main__ so it is not compiled at every start)."""

import shoal_kernel

if __name__ == "__main__":
    shoal_kernel.main()
