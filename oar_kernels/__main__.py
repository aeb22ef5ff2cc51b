import sys

from oar_kernels.cli import main

sys.exit(main())
