"""What starts, watches or reads the servers from outside: a server as a child process
(`launcher`), the three on this machine (`cluster`, `make up-local`), the scrape client
(`scrape`), and the one-screen page's address (`dashboard`). Nothing in `services`
imports this package: the image holds the server alone."""
