from progprune.report._command import report_command

if __name__ == "__main__":
    report_command(prog_name="progprune report")
