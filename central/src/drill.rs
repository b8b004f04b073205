//! Disaster-recovery drills.
