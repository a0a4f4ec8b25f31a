# The public key to accept comes from the environment (TETHER_TEST_PUBKEY) or a mounted file.
set -eu
if [ -n "${TETHER_TEST_PUBKEY:-}" ]; then printf '%s\n' "$TETHER_TEST_PUBKEY" > /etc/ssh/authorized_keys; fi
chmod 644 /etc/ssh/authorized_keys
ssh-keygen -A
exec /usr/sbin/sshd -D -e
