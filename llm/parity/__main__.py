import sys

from llm.parity.report import main

sys.exit(main())
