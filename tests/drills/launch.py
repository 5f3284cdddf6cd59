"""`python tests/drills/launch.py [--plain-user] [--max-file-size=BYTES] CMD [ARGS...]`.

Runs CMD (by exec, so it keeps this process's id) under the conditions a drill needs:

--plain-user          As root, file permissions do not apply (CAP_DAC_OVERRIDE and
                      CAP_DAC_READ_SEARCH), so a drill that chmods a directory would prove
                      nothing. Both capabilities are dropped from the bounding set (prctl
                      PR_CAPBSET_DROP) before the exec, so CMD meets file permissions as any
                      user does. Nothing to drop for a non-root user.
--max-file-size=N     RLIMIT_FSIZE: writing a file past N bytes fails with EFBIG ("File too
                      large"), as a full disk fails a write, for any user (SIGXFSZ ignored).
"""

import ctypes
import os
import resource
import signal
import sys

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def drop_permission_override() -> None:
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


if __name__ == "__main__":
    args = sys.argv[1:]
    while args and args[0].startswith("--"):
        option = args.pop(0)
        if option == "--plain-user":
            drop_permission_override()
        elif option.startswith("--max-file-size="):
            limit = int(option.split("=", 1)[1])
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        else:
            sys.exit(f"launch.py: unknown option {option}")
    os.execv(args[0], args)
