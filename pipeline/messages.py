"""How an error reads on one line, wherever it is shown: the command line's `error:` lines, the web
page's answers and its log."""


def on_one_line(error: BaseException) -> str:
    """The message with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(error).split())
