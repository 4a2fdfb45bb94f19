"""The networks lightningd knows: the name of each one's directory under the lightning-dir
and its genesis block hash, as the database's `vars` row `genesis_hash` stores it.
"""

from __future__ import annotations

from typing import Dict, Optional

# Block explorers' byte order; `vars.genesis_hash` holds the same 32 bytes reversed (the
# internal order lightningd keeps), so the lookup reverses them.
GENESIS: Dict[str, str] = {
    "bitcoin": "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f",
    "testnet": "000000000933ea01ad0ee984209779baaec3ced90fa3f408719526f8d77f4943",
    "testnet4": "00000000da84f2bafbbc53dee25a72ae507ff4914b867c565be350b0da8bf043",
    "signet": "00000008819873e925422c1ff0f99f7cc9bbb232af63a077a480a3633bee1ef6",
    "regtest": "0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206",
}

# lightningd's own aliases (--mainnet is --network=bitcoin): the directory is always the canonical name.
ALIASES: Dict[str, str] = {"mainnet": "bitcoin"}


def canonical(name: str) -> Optional[str]:
    """The directory name lightningd uses for --network=`name`, or None if it is not one."""
    n = ALIASES.get(name.lower(), name.lower())
    return n if n in GENESIS else None


def network_of(genesis_hash: bytes) -> Optional[str]:
    """The network whose genesis block `vars.genesis_hash` names, or None."""
    shown = genesis_hash[::-1].hex()
    return next((name for name, h in GENESIS.items() if h == shown), None)
