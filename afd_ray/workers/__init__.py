"""Ray actors, one per role (rollout, policy, reward, reference), the group helper and weight sync."""
