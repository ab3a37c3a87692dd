"""Convolutions: re-parameterised (channel affines folded, summed branches and sequential convs
merged), decided from their geometry, composed by pure-numpy kernel arithmetic."""
