"""Streamlit entry of the review app: `streamlit run app/review_app.py -- RUN`.

The page itself ships inside the package (`selflabel/review/app_main.py`) so `selflabel app RUN`
finds it when selflabel is installed; this file only runs it (from a checkout too).
"""
import sys
from pathlib import Path

try:
    import selflabel  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selflabel.review.app_main import main

main()
