"""The mesh's own authentication: identities issued by the gateway's CA, sealed (signed) messages,
pairwise MAC keys for the hot path. The contract for senders and receivers is ``README.md`` here."""
