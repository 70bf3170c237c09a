# Copyright (c) UPSNetRobust authors.
