package journal

import (
	"context"
	"fmt"
)

// ConsistencyBetween proves, from the stored entries, that the log's first
// size2 entries extend its first size1: the RFC 6962 consistency proof a
// witness checks before it accepts a checkpoint of size2 after one of size1.
// It recomputes every leaf from the stored bodies, so a proof for a log
// whose old entries were rewritten does not verify against the old root.
func (s *Store) ConsistencyBetween(ctx context.Context, size1, size2 uint64) ([][]byte, error) {
	if size1 > size2 {
		return nil, fmt.Errorf("journal: no consistency proof from size %d to the smaller %d", size1, size2)
	}
	leaves, _, err := loadLeaves(ctx, s)
	if err != nil {
		return nil, err
	}
	if uint64(len(leaves)) < size2 {
		return nil, fmt.Errorf("journal: the log holds %d entries, not %d", len(leaves), size2)
	}
	if size1 == 0 || size1 == size2 {
		return [][]byte{}, nil
	}
	return ConsistencyProof(leaves[:size2], size1)
}
