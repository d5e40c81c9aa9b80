"""Rewards for math word problems (GSM8K-style records {"prompt", "answer"}), for
`llmcycle align --objective grpo --reward config_hub/align/rewards/math.py:final_number`."""

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str):
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def final_number(prompt: str, completion: str, record: dict) -> float:
    """1 if the last number of the completion equals the record's answer (GSM8K's "#### N"
    tail, or the last number of "answer"), else 0."""
    answer = record["answer"].split("####")[-1]
    want, got = _number(answer), _number(completion)
    return float(want is not None and got is not None and abs(want - got) < 1e-6)
