"""``python -m cartridges.serving serve|chat [options]``: the same as the console scripts."""

import sys

from cartridges.serving.cli import chat_main, serve_main


def main() -> None:
    commands = {"serve": serve_main, "chat": chat_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m cartridges.serving {serve,chat} [options]  (--help for each)")
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
