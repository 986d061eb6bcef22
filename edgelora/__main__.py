import sys

from edgelora.frontends.cli.main import main

sys.exit(main())
