import sys

from cerulean.agent.cli import main

sys.exit(main())
