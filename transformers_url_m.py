"""gunicorn's application for the transformers engine (`transformers_url_m:app`, chosen by `--infer_type
transformers`).

The engine is gunicorn_llm/engines/transformers_engine.py; the routes are gunicorn_llm/http/. The app starts loading
the model in the background when it is built, in each worker after the fork.
"""

from gunicorn_llm.engines.transformers_engine import TransformersEngine
from gunicorn_llm.http.app import app_for

app = app_for(TransformersEngine)
