"""Whether the Hugging Face hub can be reached, asked once before a download so that offline use fails at once."""

import os
import socket


def unreachable_reason(timeout_s: float = 5.0) -> str | None:
    """None if the hub answers; otherwise why not, in words for an error message."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
    except OSError as error:
        return f"the Hugging Face hub cannot be reached ({error}), perhaps because this machine is offline"
    return None
