import sys

from atp_viz.cli import main

sys.exit(main())
