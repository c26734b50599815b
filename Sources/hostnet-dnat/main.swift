print("hostnet-dnat")
