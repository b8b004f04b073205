//! Consistent online backup of central's store and restore onto an empty data directory.
