"""What a job writes: writers and segments, the job folder, metadata, previews and progress."""
