"""Try what a careless or unlucky user does, one command each, and print a table of what happened.

    python tools/bad_inputs.py [--family NAME] [--only SUBSTRING] [--json FILE] [--jobs N]

The cases come in families: every flag's value, every environment variable, every file the project
reads, every location it writes, signals during each phase, a folder of one's own pictures and its
caches, and the constants at the top of the scripts, edited. Each runs one command of a script
against real MNIST (found as the scripts find it) and two small trained runs made first, in a
temporary directory. Its outcome is one of:

    one line     a non-zero exit with exactly one line on stderr and no traceback (a bad input's promise)
    ran          exit 0, for a case that is valid after all (e.g. a flag given twice)
    traceback    a Python traceback on stderr
    hang         still running after its time limit (killed)
    not one line a non-zero exit with nothing, or several lines, on stderr
    accepted     exit 0 for an input that should have been refused
    lost data    a file of the run (or a file outside it) changed when the case should touch nothing
    half-written a temporary (.NAME.tmp-PID) left in the run directory

The cases are in tools/bad_input_cases.py. The exit status is 0 only if every case ends in "one line" or
"ran". tests/tools/test_bad_inputs.py runs it.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bad_input_cases
from bad_input_cases import QUICK, REPO

GOOD = ("one line", "ran")


def snapshot(directory):
    directory = Path(directory)
    if not directory.exists():
        return None
    # The run's own lock holds the PID of the last process that took it: not the run's data.
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() and not p.is_symlink() else str(p.lstat().st_mode))
            for p in sorted(directory.rglob("*")) if p.name != ".lock" or p.is_symlink()}


def free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def run_case(case, root, mnist, trained):
    """Run one case in a directory of its own under root, against the MNIST files and trained runs given."""
    tmp = Path(tempfile.mkdtemp(dir=root))
    if case.run == "gan-ro":
        ro = tmp / "ro"
        ro.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(ro)], check=True)
        shutil.copytree(trained / "gan", ro / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    elif case.run:
        shutil.copytree(trained / case.run, tmp / "run")
    try:
        if case.setup:
            case.setup(tmp)
        fill = {"{tmp}": str(tmp), "{run}": str(tmp / "run"), "{ro}": str(tmp / "ro")}

        def filled(text):
            for key, value in fill.items():
                text = text.replace(key, value)
            return text

        argv = [filled(arg) for arg in case.argv]
        env = dict(os.environ, MNIST_DIR=str(mnist))
        env.update({key: filled(value) for key, value in case.env.items()})
        if env.get("TF_CONFIG") == "@cluster":
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]},
                                           "task": {"type": "worker", "index": 0}})
            env["CUDA_VISIBLE_DEVICES"] = "-1"
        if env.get("GAN_MNIST_CACHE") == "":
            del env["GAN_MNIST_CACHE"]
        watched = {"run": tmp / "run", "outside": tmp / "outside", "a-file": tmp / "a-file", "other": tmp / "other"}
        before = {name: snapshot(path) if path.is_dir() else (path.read_bytes() if path.is_file() else None)
                  for name, path in watched.items()}
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, str(REPO / argv[0]), *argv[1:]], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env, cwd=tmp,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        # SIGINT as a terminal delivers it, whatever this process inherited (`cmd &` in a script ignores it).
        if case.signal_after:
            wait_then_signal(process, case.signal_after, filled, case.limit)
        try:
            out, err = process.communicate(timeout=case.limit)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            return outcome(case, "hang", f"still running after {case.limit:g} s", started)
        # Progress a command prints on stderr before its error (a download tried, a signal acknowledged while
        # training saves) is not an error line.
        err_lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Downloading ")
                     and " received: " not in line]
        if "Traceback" in err:
            return outcome(case, "traceback", err.strip().splitlines()[-1], started)
        if case.keep:
            for name, path in watched.items():
                after = snapshot(path) if path.is_dir() else (path.read_bytes() if path.is_file() else None)
                if after != before[name] and not (name == "run" and before[name] is None):
                    changed = (sorted(set(after or {}) ^ set(before[name] or {}) | {k for k in (after or {}) if (
                        before[name] or {}).get(k, after[k]) != after[k]}) if isinstance(after, dict) else [name])
                    return outcome(case, "lost data", f"{name} changed ({', '.join(changed[:3])}); "
                                   f"{err_lines[-1] if err_lines else ''}", started)
        if (tmp / "run").is_dir() and list((tmp / "run").glob(".*.tmp-*")):
            return outcome(case, "half-written", str(list((tmp / "run").glob(".*.tmp-*"))[0]), started)
        if process.returncode == 0:
            return outcome(case, "ran" if case.expect == "ran" else "accepted", (out.strip().splitlines() or [""])[-1],
                           started)
        if len(err_lines) != 1:
            return outcome(case, "not one line", f"exit {process.returncode}: {' | '.join(err_lines[-3:])}", started)
        return outcome(case, "one line" if case.expect == "one line" else "refused", err_lines[0], started)
    finally:
        if case.run == "gan-ro":
            subprocess.run(["umount", "-l", str(tmp / "ro")])
        shutil.rmtree(tmp, ignore_errors=True)


def wait_then_signal(process, trigger, filled, limit):
    """Send the case's signal once its trigger holds: a line on stdout, a temporary file, or some seconds."""
    text, signum = trigger
    deadline = time.monotonic() + limit
    if text.startswith("@temporary "):
        pattern = Path(filled(text.split(" ", 1)[1]))
        while not list(pattern.parent.glob(pattern.name)) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        import threading
        seen = threading.Event()

        def read():
            for line in process.stdout:
                if line.startswith(text) or ("\r" in line and text in line):
                    seen.set()
                    return

        threading.Thread(target=read, daemon=True).start()
        while not seen.is_set() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signum)


def outcome(case, result, detail, started):
    return {"family": case.family, "case": case.name, "outcome": result, "detail": detail[:160],
            "seconds": round(time.monotonic() - started, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--family", default="", help="run only this family (flags, environment, files read, ...)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default: 2)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import utils
    from ganlab import errors  # noqa: F401  (TensorFlow, quietly)

    located = utils.locate_idx_dataset("mnist", "train")[0]
    if not located or len(located) != 2:
        sys.exit("bad_inputs: no MNIST IDX files found (set MNIST_DIR)")
    mnist = Path(located[0]).parent.resolve()  # The cases run in other directories.
    cases = [case for case in bad_input_cases.all_cases() if args.only in case.name and args.family in case.family]
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as root:
        root = Path(root)
        trained = root / "trained"
        bad_input_cases.use(mnist, trained)
        for script, name in (("gan_mnist.py", "gan"), ("dcgan_mnist.py", "dcgan")):
            subprocess.run([sys.executable, str(REPO / script), *QUICK, "--epochs", "1", "--data-dir", str(mnist),
                            "--out", str(trained / name)], check=True, capture_output=True, cwd=root)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda case: run_case(case, root, mnist, trained), cases))
    width = max(len(r["case"]) for r in results)
    for result in results:
        print(f"{result['family']:<18} {result['case']:<{width}} {result['outcome']:<13} {result['seconds']:>6} s  "
              f"{result['detail']}")
    counts = {}
    for result in results:
        counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
    print(f"\n{len(results)} cases: " + ", ".join(f"{count} {name}" for name, count in sorted(counts.items())))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    sys.exit(0 if all(r["outcome"] in GOOD for r in results) else 1)


if __name__ == "__main__":
    main()
