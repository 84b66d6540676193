#!/usr/bin/env bash
# Back up imag-mailer's database (and var/secret.key, if links are signed with it) into DEST.
#
#   deploy/backup/backup.sh DEST
#
# The database is the one mailer itself would use: database_url from $MAILER_CONFIG, or
# MAILER_DATABASE_URL. SQLite is copied online with SQLite's backup API (`sqlite3 .backup`):
# consistent while `mailer run` and `mailer serve` keep writing, and checked with
# `PRAGMA integrity_check` before it is kept. PostgreSQL is dumped with pg_dump (custom format).
# Keeps the newest $BACKUP_KEEP backups (default 14). Everything written is mode 600: a backup
# holds every subscriber's address and consent record.
#
# Environment: MAILER_PYTHON (default: the python next to this checkout's .venv), MAILER_CONFIG,
# MAILER_DATABASE_URL, BACKUP_KEEP.
set -euo pipefail
umask 077

dest=${1:?usage: backup.sh DEST_DIR}
here=$(cd "$(dirname "$0")/../.." && pwd)
python=${MAILER_PYTHON:-$here/.venv/bin/python}
keep=${BACKUP_KEEP:-14}
stamp=$(date -u +%Y%m%dT%H%M%SZ)

read_setting() {  # the value mailer itself resolves (config file, environment, relative paths)
  "$python" -c "import sys; from mailer.config import load_settings; s = load_settings(); \
print(s.database_url if sys.argv[1] == 'db' else s.var_dir)" "$1"
}
url=$(read_setting db)
var_dir=$(read_setting var)
mkdir -p "$dest"

case "$url" in
  sqlite:///*)
    db=${url#sqlite:///}
    [ -f "$db" ] || { echo "backup: no database at $db" >&2; exit 1; }
    out="$dest/mailer-$stamp.sqlite3"
    tmp="$out.partial"
    rm -f "$tmp"
    if command -v sqlite3 >/dev/null; then
      sqlite3 "$db" ".timeout 30000" ".backup '$tmp'"
      check=$(sqlite3 "$tmp" "PRAGMA integrity_check")
    else  # the same online backup API, through Python's sqlite3 module
      "$python" - "$db" "$tmp" <<'PY'
import sqlite3, sys
src = sqlite3.connect(sys.argv[1], timeout=30)
dst = sqlite3.connect(sys.argv[2])
src.backup(dst)
dst.close(); src.close()
PY
      check=$("$python" -c "import sqlite3, sys; \
print(sqlite3.connect(sys.argv[1]).execute('PRAGMA integrity_check').fetchone()[0])" "$tmp")
    fi
    if [ "$check" != "ok" ]; then
      echo "backup: the copy of $db fails its integrity check: $check" >&2
      rm -f "$tmp"; exit 1
    fi
    mv "$tmp" "$out"
    ;;
  postgresql*)
    libpq=$(printf '%s' "$url" | sed -E 's#^postgresql\+[a-z0-9]+://#postgresql://#')
    out="$dest/mailer-$stamp.pgdump"
    pg_dump --format=custom --no-owner --file="$out.partial" --dbname="$libpq"
    mv "$out.partial" "$out"
    ;;
  *)
    echo "backup: database_url '$url' is neither SQLite nor PostgreSQL" >&2; exit 1 ;;
esac
chmod 600 "$out"

if [ -f "$var_dir/secret.key" ]; then  # links in mails already sent are signed with it
  install -m 600 "$var_dir/secret.key" "$dest/secret-$stamp.key"
fi

# Keep the newest $keep database backups (and the key copies made with them); the names sort
# by time.
shopt -s nullglob
all=("$dest"/mailer-*.sqlite3 "$dest"/mailer-*.pgdump)
mapfile -t sorted < <(printf '%s\n' "${all[@]}" | sort -r)
for old in "${sorted[@]:$keep}"; do
  base=$(basename "$old"); base=${base#mailer-}; base=${base%%.*}
  rm -f "$old" "$dest/secret-$base.key"
done
echo "backup: $out"
