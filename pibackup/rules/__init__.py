"""Pure rules about lightningd's writes: data_version sequence, the statement filter, the replay guard."""
