import sys

from services.app import main

sys.exit(main())
