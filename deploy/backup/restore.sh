#!/usr/bin/env bash
# Restore imag-mailer's database from a backup made by backup.sh.
#
#   deploy/backup/restore.sh BACKUP     (mailer-….sqlite3 or mailer-….pgdump)
#
# Stop both services first (systemctl stop imag-mailer-run imag-mailer-serve): the script
# refuses while they run. SQLite: the backup is checked, the current database (with its -wal
# and -shm files) is moved aside as <db>.before-restore-<time>, the backup copied in with mode
# 600. PostgreSQL: pg_restore --clean --if-exists into the configured database, in one
# transaction. Afterwards run `mailer db upgrade` (a backup from an older version is migrated)
# and `mailer doctor`, then start the services. Restore secret-….key to var/secret.key if the
# links were signed with it (no MAILER_SECRET_KEY).
set -euo pipefail
umask 077

backup=${1:?usage: restore.sh BACKUP_FILE}
[ -f "$backup" ] || { echo "restore: no file $backup" >&2; exit 1; }
here=$(cd "$(dirname "$0")/../.." && pwd)
python=${MAILER_PYTHON:-$here/.venv/bin/python}
stamp=$(date -u +%Y%m%dT%H%M%SZ)

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  for unit in imag-mailer-run imag-mailer-serve; do
    if systemctl is-active --quiet "$unit"; then
      echo "restore: $unit is running: stop it first (systemctl stop $unit)" >&2; exit 1
    fi
  done
fi

url=$("$python" -c "from mailer.config import load_settings; print(load_settings().database_url)")
case "$url" in
  sqlite:///*)
    db=${url#sqlite:///}
    check=$("$python" - "$backup" <<'PY'
import sqlite3, sys
try:
    conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
    print(conn.execute("PRAGMA integrity_check").fetchone()[0])
except sqlite3.Error as exc:
    print(exc)
PY
)
    if [ "$check" != "ok" ]; then
      echo "restore: $backup fails its integrity check ($check): not restored" >&2; exit 1
    fi
    mkdir -p "$(dirname "$db")"
    for suffix in "" -wal -shm; do
      if [ -f "$db$suffix" ]; then mv "$db$suffix" "$db.before-restore-$stamp$suffix"; fi
    done
    install -m 600 "$backup" "$db.restoring"
    mv "$db.restoring" "$db"
    echo "restore: $db restored from $backup (the previous one is $db.before-restore-$stamp)"
    ;;
  postgresql*)
    libpq=$(printf '%s' "$url" | sed -E 's#^postgresql\+[a-z0-9]+://#postgresql://#')
    pg_restore --clean --if-exists --no-owner --single-transaction --dbname="$libpq" "$backup"
    echo "restore: the database restored from $backup"
    ;;
  *)
    echo "restore: database_url '$url' is neither SQLite nor PostgreSQL" >&2; exit 1 ;;
esac
echo "restore: now run 'mailer db upgrade' and 'mailer doctor', then start the services"
