"""Stand-in for the get-pip.py that ansible-test downloads from a host this machine cannot reach.

ansible-test runs ``python get_pip.py [pip install options] pip==X [--no-setuptools] [--no-wheel]``
inside each empty virtual environment it creates. This does the same with the
pip wheel bundled in CPython (ensurepip), then upgrades to the requested pip
from the package index that pip is configured for.
"""

import subprocess
import sys


def main():
    args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
    subprocess.run([sys.executable, "-m", "ensurepip", "--default-pip"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install"] + args, check=True)


if __name__ == "__main__":
    main()
