"""Entry point of the demo, locally (``python app.py``) and as a Hugging Face Space.

Everything lives in ``capstone_lib/app.py``; see its docstring for the options.
"""
from capstone_lib.app import main

if __name__ == "__main__":
    main()
