"""imag-mailer: the newsletter and mailing pipeline of IMAG Dortmund."""
