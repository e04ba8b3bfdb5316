"""`python -m udi.train` with a record of what this process writes: an audit hook (sys.addaudithook) notes every
open for writing, rename, removal and folder creation under --output_dir, and at exit the list goes to
$UDI_AUDIT_DIR/rankR.json (R: $RANK, or $SLURM_PROCID; outside --output_dir). tests/test_multinode.py starts it with torchrun. Writes that
bypass Python's file API (C++ code writing paths itself) are not seen; udi.train writes through Python's open."""
import atexit
import json
import os
import sys

WRITE_EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "shutil.rmtree", "shutil.move")


def main():
    argv = sys.argv[1:]
    output_dir = os.path.abspath(argv[argv.index("--output_dir") + 1])
    written = []

    def hook(event, arguments):
        if event == "open":
            path, mode, flags = arguments
            writes = isinstance(mode, str) and any(c in mode for c in "wax+") or \
                isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [path] if writes else []
        else:
            paths = list(arguments[:2] if event == "os.rename" else arguments[:1]) if event in WRITE_EVENTS else []
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.abspath(os.fsdecode(path))
                if path == output_dir or path.startswith(output_dir + os.sep):
                    written.append(f"{event} {os.path.relpath(path, output_dir)}")

    def report():
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))  # torchrun's, or srun's
        with open(os.path.join(os.environ["UDI_AUDIT_DIR"], f"rank{rank}.json"), "w") as f:
            json.dump(written, f)

    atexit.register(report)
    sys.addaudithook(hook)
    from udi.train import main as train
    train(argv)


if __name__ == "__main__":
    main()
