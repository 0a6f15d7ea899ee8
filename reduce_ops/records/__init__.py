"""What one stage hands the next, one module per record: its columns, writer, reader and checks
in one place (`trials` from resilience, `plan` from plan, `groups` from group, `chips` from fat,
`baseline` from pretrain). Nothing is imported here."""
