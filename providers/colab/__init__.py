"""Google Colab through notebooks on Google Drive (see ``provider.py``).

PyDrive2 and googleapiclient are imported only when Drive is first used.
"""

from .config import ColabConfig
from .provider import ColabProvider

__all__ = ["ColabConfig", "ColabProvider"]
