# Pinned versions shared by the set-up scripts. Sourced, not executed.
# Node 24 LTS >= 24.15 (openai 7, @sigstore/verify 4, tuf-js 6 need it); a complete Node with headers.
PHANTOMA_NODE_VERSION=24.21.0
