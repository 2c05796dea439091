"""Does a base beat the original? The paper's protocol, paired statistics, and the reports."""
