from mailbox.cli import run

run()
