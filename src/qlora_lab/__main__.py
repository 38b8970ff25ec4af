import sys

from qlora_lab.cli import main

sys.exit(main())
