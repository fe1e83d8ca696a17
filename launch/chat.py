"""Chat with a trained result in the terminal: streamed replies, history, a system prompt.

python launch/chat.py --model_name_or_path=out/run1
python launch/chat.py --model_name_or_path=BASE --adapter_name_or_path=out/lora1 --system="You are ..."
Type 'clear' to start a new conversation, 'exit' or Ctrl-D to quit; Ctrl-C stops a reply.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dist_glm.cli import chat_main  # noqa: E402

if __name__ == "__main__":
    chat_main(sys.argv[1:])
