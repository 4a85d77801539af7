"""Print a tenant's newest email from the SMTP sink's folder, decoded, as a mail app shows it:
its headers and its text part, with the link to open.

    uv run python examples/read_email.py t001                # from smtp-sink/
    uv run python examples/read_email.py t001 --folder demo-output/mail

The messages are quoted-printable (docs/configuration.md, "Email templates"): a long line of
the raw .eml is cut with `=` at its end, so grep the decoded text, not the file. Each message
carries its tenant's id in the X-Onboarding-Tenant header; the sink numbers its files in
arrival order.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import sys
from email.message import EmailMessage
from pathlib import Path


def newest_email(folder: Path, tenant: str) -> tuple[Path, EmailMessage] | None:
    found = None
    for path in sorted(folder.glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if isinstance(message, EmailMessage) and message["X-Onboarding-Tenant"] == tenant:
            found = (path, message)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tenant", help="the tenant's id, as in the roster (t001)")
    parser.add_argument("--folder", type=Path, default=Path("smtp-sink"), help="the sink's folder")
    args = parser.parse_args()
    found = newest_email(args.folder, args.tenant)
    if found is None:
        print(f"No email to {args.tenant} in {args.folder}/.", file=sys.stderr)
        return 1
    path, message = found
    print(f"{path}")
    for header in ("From", "To", "Subject", "Date"):
        print(f"{header}: {message[header]}")
    body = message.get_body(preferencelist=("plain",))
    print()
    print(body.get_content().rstrip() if isinstance(body, EmailMessage) else "(no text part)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
