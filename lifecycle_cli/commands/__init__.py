"""One thin module per verb: arguments in, library call, result out."""
