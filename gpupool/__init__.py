"""gpupool: one training experiment across free GPU sessions (Colab, Kaggle, local).

Importing gpupool loads neither torch nor any provider SDK.
"""

__version__ = "0.1.0"

import logging as _logging

# A library's loggers print nothing until the application configures logging (the logging
# HOWTO's advice for libraries); the CLI shows warnings on stderr.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
