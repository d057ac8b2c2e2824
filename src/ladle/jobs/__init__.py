"""The async batch path: OpenAI Files + Batches and bulk KServe jobs, stored durably and run in the gaps
real-time traffic leaves, on the same engines."""
