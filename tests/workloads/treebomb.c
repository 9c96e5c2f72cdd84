/*
 * Workload: the classic binary fork bomb, for the fork-bomb detection tests.
 *
 * usage: treebomb
 *
 * Every process forks two children and exits; each child does the same. A
 * fork refused by the pids limit is tried again at once, so the tree keeps as
 * many members as its cgroup allows and renews them as fast as the kernel
 * lets it, while the limit refuses fork after fork. It never ends by itself:
 * the test runs it in a pids cgroup it made (pids.max bounds it) and kills
 * that cgroup.
 */
#include <unistd.h>

int main(void)
{
	int made = 0;

	while (made < 2) {
		pid_t pid = fork();

		if (pid == 0)
			made = 0; /* a new member: it makes its own two */
		else if (pid > 0)
			made++;
	}
	_exit(0);
}
