"""Update rules: how the estimate ĝ moves θ. One module per rule."""
