"""A persistent shell on one SSH channel, running one command at a time.

Why: opening a channel per command costs the server's session setup plus the user's shell start-up
(tens of milliseconds when .bashrc runs pyenv or nvm). One long-lived shell pays that once; each
command then costs a fork (bash) or a fork and an exec (other shells) on the box, and one round trip.

How: the channel runs the user's login shell once (`"$SHELL" -l`, so their PATH is there); it reads a
small protocol from stdin. Each command is started by `__t_run` as a child in its own process group
(bash job control, or setsid), so the whole group can be killed; stdin is /dev/null and stdout and
stderr go to files under ~/.tether/run/. The shell answers with two NUL-terminated records: `ID S PID`
when the child started and `ID E EXIT HAS_OUT HAS_ERR GEN CWD` when it ended. Nothing the agent sends is
spliced into a shell line: the command text and the cwd travel as single-quoted arguments of
`__t_run`, and the child runs the command with `eval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import asyncssh

from .errors import ConnectError, ConnectionLost, ConnectTimeout, InvalidArgument

# The exec request (run by sshd as `$SHELL -c …`) starts the user's login shell once, so their
# profile sets PATH and friends. A POSIX login shell (bash, dash, busybox ash, ksh) then reads the
# protocol itself. Any other shell (zsh, …) becomes /bin/sh once its profile ran: only that sh ever
# reads stdin, so nothing can be swallowed by a shell that reads ahead. csh and fish can't parse this
# line and exit at once: PersistentShell.start then falls back to `exec /bin/sh -l`.
BOOT_COMMAND = (
    'case ${SHELL##*/} in bash|dash|ash|sh|ksh|mksh) exec "$SHELL" -l ;; '
    "*) exec \"$SHELL\" -l -c 'exec /bin/sh' ;; esac"
)
FALLBACK_BOOT_COMMAND = "exec /bin/sh -l"

# When a command's directory is missing: with a fallback ($__f, where the login landed) the command
# runs there, with a note (its saved cwd was removed since); without one (the caller named the
# directory) nothing runs, the EXIT trap is dropped so no cwd is recorded, and the exit status is
# 125 with one of these notes, which the executor turns into its error.
_NO_CWD = (
    '{ [ -n "$__f" ] || { trap - EXIT; if [ -d "$__d" ]; then __w=\'cannot be entered\'; '
    "elif [ -e \"$__d\" ]; then __w='is not a directory'; "
    "else __w='does not exist'; fi; printf 'tether: cwd %s %s\\n' \"$__d\" \"$__w\" >&2; exit 125; }; "
    '__t_cd -- "$__f" 2>/dev/null || __t_cd || exit 125; '
    'printf \'tether: directory %s is gone; running in %s\\n\' "$__d" "$PWD" >&2; }'
)

# cd and pwd as the shell's own builtins, whatever functions a profile defines (rvm's cd, …):
# `command cd` in POSIX shells; zsh's `command` runs only external commands unless POSIX_BUILTINS
# is set, so there it is `builtin`. Each shell a command or job runs in defines them first.
_BUILTINS = (
    'if [ -n "${ZSH_VERSION-}" ]; then __t_cd() { builtin cd "$@"; }; __t_pwd() { builtin pwd; }; '
    'else __t_cd() { command cd "$@"; }; __t_pwd() { command pwd; }; fi; '
)

# How a command is started, `exec` mode: a new shell in its own session (setsid). $1 cwd, $2 the
# command, $3 the cwd file, $4 the file of env exports, $5 the fallback directory (see _NO_CWD),
# empty when the caller named the directory. The exports come first, so that an env name
# cannot redirect tether's own variables, which are set from the arguments after them. Where the
# command ended is recorded (_RECORD_CWD) so the next command can start there: after it, and by an
# EXIT trap for a command that calls `exit` (a command that sets its own EXIT trap replaces that
# one, but not the record after it). It appends: the parent empties the file before each command,
# and on ext4 a truncating open followed by a write costs a flush on close.
# (Functions the command defined named command, pwd, cd or builtin are dropped first: the shell is
# ending, and `command() { echo x; }` would have made the cwd recorded "x".)
# (stderr's redirection first: should the record's file be gone, the shell's complaint about it
# must not land in the command's stderr.)
_RECORD_CWD = 'unset -f command pwd cd builtin 2>/dev/null; [ -s "$__c" ] || __t_pwd 2>/dev/null >>"$__c"'
# Tracing off first (BASH_ENV's `set -x` would print the env exports it reads), quietly: a trace
# of the `set` itself goes nowhere.
_QUIET = "{ set +x +v; } 2>/dev/null; "
# After the command, tracing off again before tether's own lines run, which a command's `set -x`
# would otherwise print into its stderr; the exit status taken in the same quiet group. (zsh and mksh
# trace to a descriptor of their own, and show the few lines that turn it off; a command that calls
# `exit` under `set -v` shows the EXIT trap's text, which the shell echoes as it reads it.)
_ENDED = "{ __x=$?; set +x +v; } 2>/dev/null; "
_RECORD_CWD_TRAP = shlex.quote(_QUIET + _RECORD_CWD)
_CHILD = (
    _QUIET
    + 'if [ -n "$4" ]; then . "$4"; : >"$4"; fi; '
    + _BUILTINS
    + f"__c=$3; __s=$2; __d=$1; __f=$5; trap {_RECORD_CWD_TRAP} EXIT; "
    '__t_cd -- "$__d" 2>/dev/null || ' + _NO_CWD + "; "
    f'set --; eval " $__s"; {_ENDED}{_RECORD_CWD}; exit $__x'
)

# `__t_members GROUP [BUT]` sets __mb to "PID:STAMP " for each live process (not a zombie) of the
# process group GROUP, BUT left out; empty where there is no /proc. Defined on one line, as
# _BUILTINS: it goes into a job's wrapper too, whose errors count lines from its first, and "line 3"
# must be the command's own line 3.
_MEMBERS_FN = (
    "__t_members() { __mb=; __mg=$1; __mx=${2-}; [ -r /proc/self/stat ] || return 0; "
    'for __mf in /proc/[0-9]*/stat; do read -r __ml 2>/dev/null <"$__mf" || continue; '
    "__mn=${__mf#/proc/}; __mn=${__mn%/stat}; set -- ${__ml##*) }; "
    '[ "$3" = "$__mg" ] && [ "$__mn" != "$__mx" ] && [ "$1" != Z ] && [ $# -ge 20 ] && __mb="$__mb$__mn:${20} "; '
    "done; }; "
)

# `__t_left`, run by a job's wrapper (its group's leader) once the command ended: writes to the
# job's `left` file, on one line, what the command left running in the group (`server &`), for
# job_kill and teardown to stop later (__t_leftof). Where there is no /proc, nothing is recorded.
_LEFT_FN = '__t_left() { __t_members $$ $$; [ -z "$__mb" ] || printf \'%s\\n\' "$__mb" >"$__j/left"; }; '

# A background job's wrapper. $1 cwd, $2 the command, $3 the job's directory, $4 the fallback
# directory (see _NO_CWD; empty when the caller named the cwd). The wrapper lives in
# the job's process group but shrugs off TERM/INT/HUP (a no-op trap, which children do not inherit)
# so that it can record the exit status after `job_kill`; the command runs in a subshell with the
# default dispositions, in the foreground so that INT is not ignored. What the command left running
# in the group is recorded before its end (__t_left).
_JOB = (
    _QUIET + _BUILTINS + _MEMBERS_FN + _LEFT_FN + "__j=$3; __s=$2; "
    '__t_cd -- "$1" 2>/dev/null || { [ -n "$4" ] && __t_cd -- "$4" && '
    'printf \'tether: directory %s is gone; running in %s\\n\' "$1" "$PWD" >&2; } || '
    "{ printf 'tether: cannot enter %s\\n' \"$1\" >&2; printf '125\\n' >\"$__j/exit\"; exit 125; }; "
    "trap : TERM INT HUP; "
    '( trap - TERM INT HUP; if [ -s "$3/env" ]; then . "$3/env"; : >"$3/env"; fi; __s=$2; set --; eval " $__s" ); '
    "__x=$?; "
    # Ended by a signal (job_kill TERM): the shell running the command dies at once, while the
    # program it ran may still be shutting down (a server closing its connections): the job is not
    # over, nor its output all written, until its group has no one left.
    '[ "$__x" -gt 128 ] && { __t_members $$ $$; while [ -n "$__mb" ]; do '
    "sleep 0.2 2>/dev/null || sleep 1; __t_members $$ $$; done; }; "
    "__t_left 2>/dev/null; "
    'printf \'%s\\n\' "$__x" >"$__j/exit.tmp" && mv -f "$__j/exit.tmp" "$__j/exit"'
)

# `__t_killtree SIGNAL PID` signals the process group PID leads (or the process, if it leads none)
# and every process descending from PID, read from /proc (`__t_desc`) where the box has it: a
# command may have moved some into groups of their own (GNU `timeout` does), out of reach of a kill
# of its group. They are collected before the kill: once a parent dies, its children move away.
# Returns kill's status for the group. Every kill tether sends goes through it.
KILL_TREE_FN = r"""__t_desc() {
  [ -r /proc/self/stat ] || return 0
  __dq=" $1 "; __dd=
  while [ "$__dq" != " " ]; do
    __dn=
    for __df in /proc/[0-9]*/stat; do
      read -r __dl 2>/dev/null <"$__df" || continue  # (the error redirect first: a process may be gone)
      set -- ${__dl##*) }
      case $__dq in *" $2 "*) __dp=${__df#/proc/}; __dn="$__dn${__dp%/stat} " ;; esac
    done
    __dd="$__dd$__dn"; __dq=" $__dn"
  done
  printf '%s' "$__dd"
}
__t_killtree() {
  __kd=$(__t_desc "$2")
  kill -"$1" -"$2" 2>/dev/null || kill -"$1" "$2" 2>/dev/null; __kx=$?
  [ -n "$__kd" ] && kill -"$1" $__kd 2>/dev/null
  return $__kx
}"""

# A job's pid file says "PID:STAMP", STAMP being when the process started (field 22 of
# /proc/PID/stat, in clock ticks since boot) where the box has /proc: a job whose wrapper died
# without recording its end (a reboot, the OOM killer) leaves its pid behind, and the kernel may
# give that pid to something else. A pid is taken for the job only while its stamp still matches.
# `__t_stamp PID` sets __st, __ss to the process's state and __sg to its group (empty without /proc);
# `__t_leftof DIR PID`, for a job that ended: whether what its command left running (DIR/left, see
# _LEFT_FN) still runs in its group PID, that is, one of those processes still runs as itself (pid
# and stamp) in it: then the group is still the job's, though its leader is long gone;
# `__t_ours PID[:STAMP]` sets __p to the pid and succeeds when that process runs and is the one the
# stamp names, or when it is gone but its process group is not (the wrapper was killed, the command
# runs on): a pid is never handed out while a group of that id exists. Zombies do not count: a
# killed process stays one until its parent (or, for orphans, an init that may be slow about it)
# reaps it, and `kill -0` cannot tell (`__t_livegroup` reads /proc where there is one). Builtins only.
PROC_STAMP_FN = (
    _MEMBERS_FN.rstrip("; ")
    + "\n"
    + r"""__t_stamp() {
  __st=; __ss=; __sg=
  read -r __sl 2>/dev/null <"/proc/$1/stat" || return 0
  set -- ${__sl##*) }
  __ss=$1; __sg=$3
  [ $# -ge 20 ] && shift 19 && __st=$1
  return 0
}
__t_leftof() {
  __lo=; read -r __lo 2>/dev/null <"$1/left" || [ -n "$__lo" ] || return 1
  for __r in $__lo; do
    __t_stamp "${__r%%:*}"
    [ -n "$__st" ] && [ "$__st" = "${__r#*:}" ] && [ "$__ss" != Z ] && [ "$__sg" = "$2" ] && return 0
  done
  return 1
}
__t_livegroup() {
  [ -r /proc/self/stat ] || return 0
  __t_members "$1"; [ -n "$__mb" ]
}
__t_ours() {
  __p=${1%%:*}
  if kill -0 "$__p" 2>/dev/null; then
    __t_stamp "$__p"
    case $1 in *:*) [ "$__st" = "${1#*:}" ] || return 1 ;; esac
    [ "$__ss" != Z ] && return 0
  fi
  kill -0 -"$__p" 2>/dev/null && __t_livegroup "$__p"
}"""
)

KILL_TREE = KILL_TREE_FN + '\n__t_killtree "$1" "$2"'


_INIT = r"""
{ set +x +v; } 2>/dev/null  # (a profile's xtrace would print every command's env exports to stderr)
set +e +u 2>/dev/null
set +C 2>/dev/null  # (a profile's noclobber would keep tether's files from being emptied: `: >file`)
unalias -a 2>/dev/null
SHLVL=1; export SHLVL
__T=__TETHER_DIR__
# Commands' output and jobs' files live here: readable by this user only, whatever the umask.
mkdir -p "$__T/run" "$__T/jobs" 2>/dev/null && chmod 700 "$__T" 2>/dev/null
if ! { [ -w "$__T/run" ] && [ -w "$__T/jobs" ]; }; then
  # A read-only or missing home: a directory of this user's own under the temp dir instead.
  __T="${TMPDIR:-/tmp}/tether-$(id -u)"
  mkdir -m 700 "$__T" 2>/dev/null
  [ -L "$__T" ] || { mkdir -p "$__T/run" "$__T/jobs" 2>/dev/null && chmod 700 "$__T" 2>/dev/null; }
  # Not a symlink: another user could point one at a directory of ours to pass -O, then swing it
  # to one of theirs. (The sticky temp dir keeps anyone else from replacing a real one we own.)
  { [ ! -L "$__T" ] && [ -O "$__T" ] && [ -w "$__T/run" ] && [ -w "$__T/jobs" ]; } || __T=
fi
# The whole output of cut commands is kept a week, and so is a job once it ended (then job_list
# forgets it), swept in the background: the shell is ready without waiting for find. (Job
# directories are named j-HEX: a name never holds a newline.)
[ -n "$__T" ] && {
  find "$__T/run" -type f -mtime +7 -exec rm -f {} \;
  find "$__T/jobs" -mindepth 2 -maxdepth 2 -name exit -type f -mtime +7 |
    while IFS= read -r __x; do rm -rf "${__x%/exit}"; done
} </dev/null >/dev/null 2>&1 &
case "${SHELL##*/}" in
  bash|zsh|ksh|mksh|dash|ash|sh) __TSH=$SHELL ;;
  *) __TSH=/bin/sh ;;
esac
[ -x "$__TSH" ] || __TSH=/bin/sh
__BUILTINS__
# $1 a file, $2 its text, readable by this user only. Through a here-document, not an argument:
# in mksh printf is /usr/bin/printf, and ps shows every process's arguments to every user.
__t_private() {
  (umask 077; cat >"$1" <<__TETHER_PRIVATE__
$2
__TETHER_PRIVATE__
  )
}
__TCHILD=__CHILD__
__TJOB=__JOB__
if command -v setsid >/dev/null 2>&1; then
  __TPG=setsid
  __t_bg() { setsid "$@" </dev/null >>"$__o" 2>>"$__e" 7<&- 8<&- & }
elif command -v perl >/dev/null 2>&1; then
  __TPG=perl
  __t_bg() { perl -e 'setpgrp(0,0); exec {$ARGV[0]} @ARGV or exit 127' "$@" </dev/null >>"$__o" 2>>"$__e" 7<&- 8<&- & }
else
  __TPG=none
  __t_bg() { "$@" </dev/null >>"$__o" 2>>"$__e" 7<&- 8<&- & }
fi
if [ -n "${BASH_VERSION:-}" ] && set -m 2>/dev/null && case $- in *m*) true ;; *) false ;; esac; then
  # `fork` mode: with job control on, every background job gets its own process group, so a
  # forked subshell is enough; no exec, and the functions the profile defined (nvm, …) still work.
  __TPG=fork
  __t_spawn() {
    # The env exports first: tether's own variables are then set from the arguments.
    ( set +m; [ -n "$3" ] && eval "$3"
      __c=$4; __d=$1; __s=$2; __f=$5; set --
      trap __RECORD_CWD_TRAP__ EXIT
      __t_cd -- "$__d" 2>/dev/null || __NO_CWD__
      __t_eval; __ENDED__ __RECORD_CWD__; exit $__x
    ) </dev/null >>"$__o" 2>>"$__e" 7<&- 8<&- &
  }
else
  __t_spawn() {
    # Environment values go through a private file, not the new shell's arguments (ps shows those).
    __vf=
    if [ -n "$3" ]; then __t_private "$__P.v" "$3"; __vf="$__P.v"; fi
    # A long command goes through a file too: one argument may hold at most 128 KiB (Linux).
    __sc=$2
    if [ ${#__sc} -gt __LONG__ ]; then __t_private "$__P.s" "$2"; __sc='. "${__c%.c}.s"'; fi
    __t_bg "$__TSH" -c "$__TCHILD" "${__TSH##*/}" "$1" "$__sc" "$__c" "$__vf" "$5"
  }
fi
__t_run() {
  # This shell's own output files, emptied for each command; the command appends to them.
  __o="$__P.o"; __e="$__P.e"; __c="$__P.c"
  # (a command may have removed tether's directory: `rm -rf ~/.tether`, or the whole home's contents)
  [ -d "$__T/run" ] || { mkdir -p "$__T/run" "$__T/jobs" && chmod 700 "$__T"; } 2>/dev/null
  # What the last command left running in its process group (`server &`, `(sleep 1; echo) &`) still
  # appends to these files: it gets them to itself, unlinked, and this command new ones (which
  # tether opens anew: see __g below), or its output would turn up in the results of later commands.
  [ -n "$__lp" ] && kill -0 -"$__lp" 2>/dev/null && rm -f "$__o" "$__e"
  : >"$__o"; : >"$__e"; : >"$__c"
  # tether keeps these two files open over SFTP from one command to the next (reading an output
  # then takes one round trip, not two). This shell holds them too, as fds 7 and 8 (which no
  # command inherits), to tell whether the paths still name those files: when they don't (a command
  # removed ~/.tether) it holds the new ones and counts up __g, which the end record reports, and
  # tether opens them anew.
  { [ "$__o" -ef /dev/fd/7 ] && [ "$__e" -ef /dev/fd/8 ]; } 2>/dev/null || {
    [ -r "$__o" ] && [ -r "$__e" ] && command exec 7<"$__o" 8<"$__e"; __g=$((__g + 1)); }
  __t_spawn "$2" "$3" "$4" "$__c" "$5"
  __p=$!; __lp=$__p  # (its process group's id; without groups, no group has it, and nothing is found)
  printf '%s S %s\0' "$1" "$__p"
  wait "$__p" 2>/dev/null; __x=$?
  __cwd=
  if [ -s "$__c" ]; then
    # Bytes, not characters: in a UTF-8 locale bash's read takes a newline after a byte that is
    # not UTF-8 for part of that character, and the cwd would gain a line break.
    __lc=${LC_ALL-__unset}; LC_ALL=C
    while IFS= read -r __l || [ -n "$__l" ]; do __cwd="${__cwd:+$__cwd
}$__l"; done <"$__c"
    if [ "$__lc" = __unset ]; then unset LC_ALL; else LC_ALL=$__lc; fi
  fi
  # (by its path, else by this shell's descriptor on it: a command that removed tether's directory
  # wrote to files that are still there for tether's open SFTP handles)
  __so=0; { [ -s "$__o" ] || [ -s /dev/fd/7 ]; } 2>/dev/null && __so=1
  __se=0; { [ -s "$__e" ] || [ -s /dev/fd/8 ]; } 2>/dev/null && __se=1
  printf '%s E %s %s %s %s %s\0' "$1" "$__x" "$__so" "$__se" "$__g" "$__cwd"
}
__t_job() {
  # Job control off while launching: a background child that already leads its own group would
  # make setsid fork, and $! would name a parent that exits at once.
  __o="$2/stdout"; __e="$2/stderr"; __m=$-
  # Environment values through a private file the job reads and empties (not its arguments).
  if [ -n "$5" ]; then __t_private "$2/env" "$5"; fi
  # A job starts with INT and QUIT at their defaults, so that job_kill INT works: a shell without
  # job control starts a background command with them ignored (POSIX), and a shell that finds them
  # ignored cannot reset them. GNU env (coreutils 8.31+) resets them; elsewhere only TERM, KILL,
  # HUP and the rest reach a job. (Asked at the first job, not at every shell's start.)
  if [ -z "${__TDFL+asked}" ]; then
    __TDFL=; env --default-signal=INT,QUIT true 2>/dev/null && __TDFL='env --default-signal=INT,QUIT'
  fi
  # A long command goes through a file in the job's directory (one argument holds at most 128 KiB).
  __sc=$4
  if [ ${#__sc} -gt __LONG__ ]; then __t_private "$2/command" "$4"; __sc='. "$__j/command"'; fi
  set +m
  __t_bg $__TDFL "$__TSH" -c "$__TJOB" "${__TSH##*/}" "$3" "$__sc" "$2" "$6"
  __p=$!
  case $__m in *m*) set -m ;; esac
  __t_stamp "$__p"
  printf '%s\n' "$__p${__st:+:$__st}" >"$2/pid"
  printf '%s R %s\0' "$1" "$__p"
}
__t_alive() {
  __i=$1; shift; __a=
  for __r in "$@"; do __t_ours "$__r" && __a="$__a $__r"; done
  printf '%s R%s\0' "$__i" "$__a"
}
__PROC_STAMP_FN__
__KILL_TREE_FN__
__t_kill() {
  __t_killtree "$2" "$3"
  printf '%s R %s\0' "$1" "$?"
}
# `__t_jobkill ID SIGNAL PID:STAMP NOTE`: signal a job's tree only while its pid is still the job's
# (see __t_ours), noting the signal in the file NOTE first (the job's end is then told as its
# doing); replies "gone" when the pid is no longer the job's.
# `__t_leftkill ID SIGNAL PID DIR`, for a job that ended: signal what its command left running in
# its group (see __t_leftof), noting the signal; replies "sent", or "none" when nothing is left.
__t_leftkill() {
  if __t_leftof "$4" "$3"; then
    printf '%s' "$2" >"$4/signal"
    __t_killtree "$2" "$3"
    printf '%s R sent\0' "$1"
  else
    printf '%s R none\0' "$1"
  fi
}
__t_jobkill() {
  if __t_ours "$3"; then
    printf '%s' "$2" >"$4"
    __t_killtree "$2" "$__p"
    printf '%s R %s\0' "$1" "$?"
  else
    printf '%s R gone\0' "$1"
  fi
}
__P="$__T/run/__NONCE__"; __g=0
trap 'rm -f "$__P.o" "$__P.e" "$__P.c" "$__P.v" "$__P.s"' EXIT
# In `fork` mode a command runs in __t_eval, which is defined from a file named `bash`: bash's error
# messages name the file the running function came from ("main" for this script) and count lines
# from this script's first line, so a command's errors would read "main: line 57: …" for its own
# line 3. From that file they read as under `bash -c`. (Elsewhere the command's $0 is the shell's
# name and its eval sits on line 1: "dash: 3: …", as dash -c says.)
# The file is written once (by the first shell; its name carries the version of its text). The
# space before the command keeps eval from taking a command that starts with '-' for its options.
__t_eval() { eval " $__s"; }
__te="$__T/eval-2"
if [ "$__TPG" = fork ] && [ -n "$__T" ] && { [ -s "$__te/bash" ] || {
  mkdir -p "$__te" && printf '%s\n' '__t_eval() { eval " $__s"; }' >"$__te/bash.$$" &&
    mv -f "$__te/bash.$$" "$__te/bash"
}; } 2>/dev/null; then
  __t_od=$PWD; __t_oo=$OLDPWD; __t_sp=; shopt -q sourcepath && __t_sp=1
  # (`. bash`, no slash: so that its name is just "bash"; sourcepath off, so it is ./bash)
  if command cd "$__te" 2>/dev/null; then shopt -u sourcepath; . bash; command cd "$__t_od"; fi
  [ -n "$__t_sp" ] && shopt -s sourcepath; OLDPWD=$__t_oo
fi
__rg=0; command -v rg >/dev/null 2>&1 && __rg=1
printf 'READY %s %s %s %s\0%s\0%s\0%s\0' "__NONCE__" "$__TPG" "$__rg" "$__TSH" "$HOME" "$__T" "$PWD"
"""
# Characters of a command beyond which it is handed to a new shell through a file, not as an
# argument: 32 Ki characters of up to 4 bytes each stay within Linux's 128 KiB per argument.
LONG_COMMAND_CHARS = 32768
EOF_GRACE_S = 1.0  # how long closing a shell waits for it to end on its own (see PersistentShell.close)
_INIT = (
    _INIT.replace("__LONG__", str(LONG_COMMAND_CHARS))
    .replace("__CHILD__", shlex.quote(_CHILD))
    .replace("__JOB__", shlex.quote(_JOB))
    .replace("__KILL_TREE_FN__", KILL_TREE_FN)
    .replace("__PROC_STAMP_FN__", PROC_STAMP_FN)
    .replace("__NO_CWD__", _NO_CWD)
    .replace("__RECORD_CWD_TRAP__", _RECORD_CWD_TRAP)
    .replace("__ENDED__", _ENDED)
    .replace("__RECORD_CWD__", _RECORD_CWD)
    .replace("__BUILTINS__", _BUILTINS)
)


DEFAULT_TETHER_DIR = "~/.tether"


def wire_bytes(text: str) -> bytes:
    """What goes down a shell's stdin: UTF-8, with the surrogate escapes of bytes that are not
    UTF-8 (os.fsdecode's) sent as those bytes. A lone surrogate has no bytes: InvalidArgument."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"the command, a path or a value contains {text[exc.start]!r}, a lone surrogate that UTF-8 "
            "cannot encode; send valid Unicode text"
        ) from None


@dataclass(frozen=True)
class ShellInfo:
    """What a shell learned about its box when it started."""

    home: str
    shell: str  # the shell commands run in
    process_groups: str  # "fork" (bash job control), "setsid", "perl" or "none": how commands get their own group
    has_rg: bool
    tether_dir: str  # tether's own files on the box: run/ (command output) and jobs/
    start_dir: str  # where the login landed: the first command's cwd

    @property
    def run_dir(self) -> str:
        return f"{self.tether_dir}/run"

    def output_paths(self, shell_nonce: str) -> tuple[str, str]:
        """stdout and stderr files of the shell with this nonce (reused by each of its commands)."""
        prefix = f"{self.run_dir}/{shell_nonce}"
        return f"{prefix}.o", f"{prefix}.e"

    @property
    def jobs_dir(self) -> str:
        return f"{self.tether_dir}/jobs"


def _shell_word(path: str) -> str:
    """`path` as a shell word, with a leading ~/ meaning the login user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


Stream = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class Finished:
    exit_code: int
    has_stdout: bool
    has_stderr: bool
    cwd: str | None
    # Which output files the command wrote: counts up each time the shell had to create them anew
    # (see __t_run); a handle tether opened for an earlier generation names other files.
    files_generation: int = 0

    def wrote(self, stream: Stream) -> bool:
        """Whether the command wrote anything to `stream`."""
        return self.has_stdout if stream == "stdout" else self.has_stderr


class ShellDied(ConnectionLost):
    """The shell's channel closed (the connection died, or something killed the shell)."""


class PersistentShell:
    """One shell process on one channel. Not safe for concurrent use: one command at a time."""

    def __init__(
        self,
        process: asyncssh.SSHClientProcess[bytes],
        info: ShellInfo,
        conn: asyncssh.SSHClientConnection,
        nonce: str,
    ) -> None:
        self._process = process
        self._conn = conn
        # Where this shell's commands write: emptied before each command, read back before the shell
        # takes the next one.
        self.stdout_path, self.stderr_path = info.output_paths(nonce)
        self.info = info
        # Set when a command was cancelled before its pid came back: what must happen (wait for the
        # pid, kill it) before this shell may be closed.
        self.before_close: Callable[[], Awaitable[None]] | None = None
        # What else lets go when the shell closes (handles tether holds on its output files).
        self.on_close: list[Callable[[], None]] = []
        self._stderr_tail = b""
        self._stderr_task = asyncio.get_running_loop().create_task(self._drain_stderr())

    @classmethod
    async def start(
        cls,
        conn: asyncssh.SSHClientConnection,
        timeout: float,
        tether_dir: str = DEFAULT_TETHER_DIR,
        channel_open: Callable[[], None] = lambda: None,
    ) -> PersistentShell:
        """Open the channel, start the login shell and wait for it to report ready.

        Raises:
            ConnectTimeout: the shell did not report ready within `timeout` (a profile that waits
                for input, or a login shell that cannot run `-l -c`). `channel_open` is called once
                its session is open and the login shell runs.
            asyncssh.ChannelOpenError: the server refused the channel (the pool handles it).
        """
        init = _INIT.replace("__TETHER_DIR__", _shell_word(tether_dir))
        try:
            return await cls._start(conn, BOOT_COMMAND, timeout, init, channel_open)
        except ShellDied:
            # Login shells that don't understand `-l -c` (csh, tcsh) exit at once: fall back to sh -l.
            return await cls._start(conn, FALLBACK_BOOT_COMMAND, timeout, init, channel_open)

    @classmethod
    async def _start(
        cls,
        conn: asyncssh.SSHClientConnection,
        command: str,
        timeout: float,
        init: str,
        channel_open: Callable[[], None],
    ) -> PersistentShell:
        process = await conn.create_process(command, encoding=None)
        channel_open()
        nonce = secrets.token_hex(8)
        try:
            process.stdin.write(init.replace("__NONCE__", nonce).encode("utf-8", "surrogateescape"))
            marker = f"READY {nonce} ".encode()
            async with asyncio.timeout(timeout):
                while True:
                    record = await _read_record(process)
                    # Anything a profile printed before our marker is not ours: skip it.
                    at = record.find(marker)
                    if at >= 0:
                        break
                # Paths come as records of their own: they may contain spaces.
                home, tether_dir, start_dir = [
                    (await _read_record(process)).decode("utf-8", "surrogateescape") for _ in range(3)
                ]
        except TimeoutError:
            process.close()
            raise ConnectTimeout(
                f"the login shell did not start within {timeout:g}s: its start-up files hang or wait on "
                "something (a stale lock, say ~/.pyenv/shims/.pyenv-shim); the account's shell run as "
                "`SHELL -lx -c true` on the box shows where"
            ) from None
        except BaseException:
            process.close()
            raise
        if not tether_dir:
            process.close()
            raise ConnectError(
                "the box has no directory tether can write its command output to: neither the tether "
                "dir (default ~/.tether) nor $TMPDIR (or /tmp) is writable by this user"
            )
        pg, rg, shell = record[at + len(marker) :].decode("utf-8", "surrogateescape").split(" ", 2)
        info = ShellInfo(
            home=home, shell=shell, process_groups=pg, has_rg=rg == "1", tether_dir=tether_dir, start_dir=start_dir
        )
        return cls(process, info, conn, nonce)

    @property
    def alive(self) -> bool:
        return not self._process.is_closing()

    @property
    def connection_alive(self) -> bool:
        return not self._conn.is_closed()

    def output_path(self, stream: Stream) -> str:
        return self.stdout_path if stream == "stdout" else self.stderr_path

    async def begin(self, command_id: str, cwd: str, script: str, exports: str = "", fallback: str = "") -> int:
        """Start `script` in `cwd` with `exports` (export statements) applied first; return the child's
        pid (= its process group when groups are on). Should `cwd` be missing, it runs in `fallback`
        instead, or, when that is empty, not at all (exit status 125, `tether: cwd … ` on stderr)."""
        words = " ".join(shlex.quote(word) for word in (cwd, script, exports, fallback))
        self._send(f"__t_run {command_id} {words}\n")
        return await self.started(command_id)

    async def started(self, command_id: str) -> int:
        """The pid of the command `begin` sent, once the shell reports it started."""
        record = await self._expect(command_id, "S")
        return int(record[0])

    async def finish(self, command_id: str) -> Finished:
        """Wait for the command started by `begin` to end."""
        fields = await self._expect(command_id, "E", maxsplit=4)
        exit_code, has_out, has_err, files = int(fields[0]), fields[1] == "1", fields[2] == "1", int(fields[3])
        cwd = fields[4] if len(fields) > 4 and fields[4] else None
        return Finished(exit_code, has_out, has_err, cwd, files)

    async def call(self, function: str, *args: str) -> list[str]:
        """Call one of the shell's builtin-only helpers (`job`, `alive`, `kill`) and return its reply."""
        call_id = secrets.token_hex(8)
        self._send(" ".join([f"__t_{function}", call_id, *(shlex.quote(a) for a in args)]) + "\n")
        return await self._expect(call_id, "R", maxsplit=-1, allow_empty=True)

    def _send(self, line: str) -> None:
        """One line of shell code down the shell's stdin (see wire_bytes)."""
        data = wire_bytes(line)
        try:
            self._process.stdin.write(data)
        except (BrokenPipeError, asyncssh.Error, OSError) as exc:
            raise ShellDied(f"the shell's channel is closed: {exc}") from None

    async def _expect(self, command_id: str, kind: str, maxsplit: int = -1, allow_empty: bool = False) -> list[str]:
        prefix = f"{command_id} {kind}"
        while True:
            record = (await _read_record(self._process, self._stderr_tail)).decode("utf-8", "surrogateescape")
            if record.startswith(prefix):
                rest = record[len(prefix) :].removeprefix(" ")
                if allow_empty and not rest:
                    return []
                return rest.split(" ", maxsplit) if maxsplit >= 0 else rest.split(" ")

    async def _drain_stderr(self) -> None:
        # The shell itself only writes to stderr when something is wrong; keep the end for messages.
        with contextlib.suppress(Exception):
            while chunk := await self._process.stderr.read(4096):
                self._stderr_tail = (self._stderr_tail + chunk)[-2000:]

    async def close(self) -> None:
        for let_go in self.on_close:
            with contextlib.suppress(Exception):
                let_go()
        # The end of its input first: the shell's script ends, and its EXIT trap removes this
        # shell's output files. (A closed channel leaves that to a signal, which a shell may not
        # live to act on: the files, a command's whole output, then wait a week for the sweep.)
        # Not waited for long: a shell still busy with something is closed as before.
        with contextlib.suppress(Exception):
            self._process.stdin.write_eof()
            await asyncio.wait_for(self._process.wait_closed(), EOF_GRACE_S)
        self._process.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._process.wait_closed(), 2)
        self._stderr_task.cancel()


async def _read_record(process: asyncssh.SSHClientProcess[bytes], stderr_tail: bytes = b"") -> bytes:
    try:
        return (await process.stdout.readuntil(b"\0"))[:-1]
    except asyncio.IncompleteReadError:
        detail = stderr_tail.decode("utf-8", "replace").strip()
        raise ShellDied("the shell exited" + (f": {detail}" if detail else "")) from None
    except (asyncssh.Error, OSError) as exc:
        raise ShellDied(f"the shell's channel failed: {exc}") from None
